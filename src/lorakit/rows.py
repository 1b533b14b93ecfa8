"""Row plans for per-row adapters: the rows of one batch grouped by adapter, and their layouts for
batched matmuls (the rows over the slots of a layer's ``AdapterBank`` or ``HotBank``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowPlan:
    """Rows of one forward grouped by adapter.

    Attributes:
        rows: batch size N of the forward.
        perm: int64 (M,), the indices of rows that use an adapter, sorted by adapter.
        segments: ``(adapter_name, start, end)``: ``perm[start:end]`` are that adapter's rows.
        single_full: True when all N rows use one adapter and ``perm`` is ``arange(N)``.
        contiguous: True when each adapter's rows are consecutive in the batch (``perm[s:e]`` is
            ``arange(perm[s], perm[s] + e - s)``): its bypass then works on slices, with no copies.
        names: the segments' adapter names, in their order; ``adapters``: the same as a frozenset (a
            layer holding all of them routes the plan's segments as they are: ``routes.held_segments``).
    """

    rows: int
    perm: torch.Tensor
    segments: tuple[tuple[str, int, int], ...]
    single_full: bool
    contiguous: bool = False
    names: tuple[str, ...] = ()
    adapters: frozenset = frozenset()


def plan_rows(names: Sequence[str | None], device: torch.device | str = "cpu",
              rank: dict[str, int] | None = None) -> RowPlan:
    """Group row indices by adapter name (None rows get the base model only).

    Segments come in the order of ``rank`` (adapter -> position, e.g. injection order) when given,
    else in order of first appearance; with ``rank``, every mix of one set of adapters lists them
    in the same order, so layers can reuse the factors they gathered for that set.
    """
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None:
            groups.setdefault(n, []).append(i)
    if rank is not None:
        groups = dict(sorted(groups.items(), key=lambda item: rank[item[0]]))
    order, segments = [], []
    for n, idx in groups.items():
        segments.append((n, len(order), len(order) + len(idx)))
        order.extend(idx)
    single_full = len(groups) == 1 and len(order) == len(names)
    contiguous = all(idx == list(range(idx[0], idx[0] + len(idx))) for idx in groups.values())
    perm = torch.tensor(order, dtype=torch.long, device=device)
    order = tuple(groups)
    return RowPlan(len(names), perm, tuple(segments), single_full, contiguous, order, frozenset(order))


def run_grouped(x: torch.Tensor, plan: RowPlan, modules: dict, default) -> torch.Tensor:
    """Each row of ``x`` through the callable of its adapter (``modules[name]``), the other rows (None,
    adapters missing from ``modules``) through ``default``; the outputs back in row order. Each callable
    sees only its own rows (``x.index_select(0, rows)``, or all of ``x`` when one callable takes every
    row in order) and must return a tensor with one row per input row; the first group's dtype is the
    output's, ``default``'s when it has rows."""
    groups = [(modules[n], plan.perm[s:e]) for n, s, e in plan.segments if n in modules]
    if not groups or plan.single_full:
        return (groups[0][0] if groups else default)(x)
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _, sel in groups:
        rest[sel] = False
    if bool(rest.any()):
        groups.insert(0, (default, rest.nonzero().squeeze(1)))
    parts = [fn(x.index_select(0, sel)) for fn, sel in groups]
    order = torch.cat([sel for _, sel in groups])
    out = torch.cat([p.to(parts[0].dtype) for p in parts])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return out.index_select(0, inverse)


@dataclass(frozen=True)
class BankLayout:
    """Rows of one plan laid out over a bank's S slots: ``index`` int64 (S·L,), the batch row in
    each slot position (padding repeats a row); ``keep`` float (S, L, 1, 1), 0 at padding, or None;
    ``inverse`` int64 (N,), each row's position, or S·L (a zero row) for rows without an adapter here;
    ``complete``: no such row (no zero row needed); ``identity``: ``index`` is ``arange(N)`` (rows
    already grouped by slot, in slot order, none padded: nothing to gather)."""

    index: torch.Tensor
    keep: torch.Tensor | None
    inverse: torch.Tensor
    length: int
    complete: bool = False
    identity: bool = False


def bank_layout(names: list, slots: tuple, device) -> BankLayout:
    """The ``BankLayout`` of rows ``names`` (adapter or None per row) over bank slots ``slots``."""
    rows: dict[str, list[int]] = {n: [] for n in slots}
    for i, n in enumerate(names):
        if n in rows:
            rows[n].append(i)
    length = max(1, max(len(r) for r in rows.values()))
    index, keep, inverse = [], [], [len(slots) * length] * len(names)
    for j, n in enumerate(slots):
        for t in range(length):
            real = t < len(rows[n])
            index.append(rows[n][t] if real else 0)
            keep.append(1.0 if real else 0.0)
            if real:
                inverse[rows[n][t]] = j * length + t
    keep_t = None if all(keep) else torch.tensor(keep, device=device).view(len(slots), length, 1, 1)
    complete = max(inverse) < len(slots) * length  # every row has an adapter in the bank
    identity = keep_t is None and index == list(range(len(names)))
    return BankLayout(torch.tensor(index, device=device), keep_t, torch.tensor(inverse, device=device), length,
                      complete, identity)
