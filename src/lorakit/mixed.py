"""A different adapter for each row of one batch (S-LoRA / Punica style serving).

An add-on to the layers: ``mixed_batch`` installs a ``RowRouter`` as the model state's ``rows``;
every LoRA layer's forward then hands ``(layer, x, out)`` to ``RowRouter.add_bypass`` instead of
adding the active adapters. The router reads the batch size from the layer's own input
(``x.shape[0]``), so nothing is guessed from the model's argument names.

The base matmuls run once for the whole batch. The LoRA part groups rows by adapter once per
batch size (a stable sort into contiguous segments, as in SGMV, in injection order). A linear
LoRA layer takes the factors of the mix's adapters from its ``AdapterBank`` (every resident
adapter stacked once, rank-padded with zeros, scaling folded into B; restacked only when an
adapter is added or deleted, a slot rewritten when one changes in place) and keeps them for the
next mix of the same set. It then either gathers each adapter's rows, padded to the longest
segment, and runs one batched matmul pair (``adapter.stacked_bypass``), or, for decoding-sized
forwards of a small mix, runs all of the mix's adapters on every row in two dense matmuls masked
to each row's own (``DENSE_COLUMNS``, ``DENSE_WORK``). Either way its op count does not grow with
the number of adapters. Other layer types (and forwards that need gradients) run one small A/B
pair per adapter. Activations are gathered, never a per-row copy of adapter weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import masked_bypass_, stacked_bypass
from .errors import MergeStateError, MixedBatchError
from .tree import attach_state, check_known, is_merged


@dataclass(frozen=True)
class Padded:
    """Segments laid out for a batched matmul: ``shape`` (k adapters, L rows each).

    Attributes:
        index: int64 (k * L,), batch rows grouped by adapter; a segment shorter than L repeats its
            first row.
        keep: float (k, L, 1, 1), 0 at those repeats (their bypass is zeroed), or None if no padding.
        inverse: int64 (N,) with ``index[inverse] = arange(N)`` when ``index`` is a permutation of
            all N rows (no padding, no base-only rows), else None: the results then go back to
            their rows with one gather instead of a scatter.
    """

    index: torch.Tensor
    keep: torch.Tensor | None
    shape: tuple[int, int]
    inverse: torch.Tensor | None = None


@dataclass(frozen=True)
class RowPlan:
    """Rows of one forward grouped by adapter.

    Attributes:
        rows: batch size N of the forward.
        perm: int64 (M,), the indices of rows that use an adapter, sorted by adapter.
        segments: ``(adapter_name, start, end)``: ``perm[start:end]`` are that adapter's rows.
        single_full: True when all N rows use one adapter and ``perm`` is ``arange(N)``.
    """

    rows: int
    perm: torch.Tensor
    segments: tuple[tuple[str, int, int], ...]
    single_full: bool
    _padded: dict = field(default_factory=dict, compare=False, repr=False)

    def padded(self, segments: tuple[tuple[str, int, int], ...]) -> Padded | None:
        """The batched layout of ``segments`` (a subset of ``self.segments``), or None when padding
        every segment to the longest would more than double the rows (the loop is cheaper then)."""
        if segments not in self._padded:
            self._padded[segments] = self._layout(segments)
        return self._padded[segments]

    def _layout(self, segments) -> Padded | None:
        lengths = [e - s for _, s, e in segments]
        k, length = len(segments), max(lengths)
        if k * length > 2 * sum(lengths):
            return None
        device = self.perm.device
        index = torch.empty((k, length), dtype=torch.long, device=device)
        for j, (_, s, e) in enumerate(segments):
            index[j, : e - s] = self.perm[s:e]
            index[j, e - s:] = self.perm[s]
        keep = None
        if min(lengths) < length:
            steps = torch.arange(length, device=device)
            keep = (steps < torch.tensor(lengths, device=device)[:, None]).float()[..., None, None]
        index = index.flatten()
        inverse = torch.argsort(index) if keep is None and len(index) == self.rows else None
        return Padded(index, keep, (k, length), inverse)


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
    perm = torch.tensor(order, dtype=torch.long, device=device)
    return RowPlan(len(names), perm, tuple(segments), single_full)


# A batched layer computes every present adapter for every row (two dense matmuls, a mask keeping
# each row's own adapter) while the adapters' stacked columns (k·r) stay within DENSE_COLUMNS and
# rows x tokens x adapters within DENSE_WORK: there a few dense ops beat a gather, two small bmms
# and a scatter; otherwise the padded segments (measured on 2 CPU cores, SmolLM2 shapes: dense is
# 20 us per layer at k·r = 16, 42 us at 64; segments about 45 us).
DENSE_COLUMNS = 32
DENSE_WORK = 1024


class _Route:
    """How one layer adds the bypasses of one row plan: the segments of adapters it holds and, for
    a batched (linear) layer, those adapters' factors gathered once from its ``AdapterBank``:
    ``a_t`` (k, in, r), ``b_t`` (k, r, out) for padded segments; ``a_cat`` (in, k·r), ``b_cat``
    (k·r, out) and ``mask`` (N, 1, k·r), 1 on each row's own adapter, for the dense form."""

    __slots__ = ("segments", "names", "pad", "a_t", "b_t", "a_cat", "b_cat", "mask")

    def __init__(self, layer, plan: RowPlan, masks) -> None:
        self.segments = layer.held_segments(plan.segments)
        self.names = tuple(name for name, _, _ in self.segments)
        self.pad = self.a_t = self.b_t = self.a_cat = self.b_cat = self.mask = None
        if getattr(layer, "batched", False) and len(self.segments) > 1:
            self.pad = plan.padded(self.segments)
            with torch.no_grad():
                self.a_t, self.b_t = layer.stacked(self.names)  # (k, in, r), (k, r, out)
                k, n_in, r = self.a_t.shape
                if k * r <= DENSE_COLUMNS:
                    self.a_cat = self.a_t.permute(1, 0, 2).reshape(n_in, k * r)
                    self.b_cat = self.b_t.view(k * r, -1)
                    self.mask = masks(self.names, r, self.a_t.dtype, self.a_t.device)


class RowRouter:
    """Adds each batch row's own adapter in every LoRA layer while ``mixed_batch`` runs.

    Caches for the block's lifetime: the row plan per (batch size, device); per layer and plan a
    ``_Route`` (the adapters it holds, their factors gathered from the layer's resident
    ``AdapterBank``, which the layer keeps for the next block with the same set of adapters); the last gathered input (q/k/v read one tensor, gate/up another, so the next
    layers reuse its gather). Decoding steps of one ``generate`` share one plan and one route per
    layer: nothing is sorted or stacked per step.
    """

    def __init__(self, names: list[str | None], rank: dict[str, int] | None = None) -> None:
        self.names = names
        self.rank = rank  # adapter -> position: segments of one set of adapters always in one order
        self._plans: dict[tuple[int, str], RowPlan] = {}
        self._routes: dict[tuple[int, int], _Route] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._gather: tuple | None = None

    def plan(self, batch: int, device) -> RowPlan:
        """The row plan for a forward of ``batch`` rows; each name repeats ``batch / len(names)`` times
        in place, as ``generate`` expands rows for beam search and ``num_return_sequences``.

        Raises:
            MixedBatchError: ``batch`` is not a multiple of the number of names.
        """
        key = (batch, str(device))
        if key not in self._plans:
            n = len(self.names)
            if batch % n:
                raise MixedBatchError(
                    f"mixed_batch got {n} adapter names but the forward has batch size {batch} "
                    f"(expected {n}, or a multiple of it for beam search / num_return_sequences)"
                )
            self._plans[key] = plan_rows(self._row_names(batch), device, self.rank)
        return self._plans[key]

    def add_bypass(self, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus, for each row, the bypass of that row's adapter on ``layer`` (Hu et al. 2021 eq. 3)."""
        if x.dim() < 2:
            raise MixedBatchError(f"mixed_batch needs inputs with a batch dimension; a layer got shape {list(x.shape)}")
        plan = self.plan(x.shape[0], x.device)
        key = (id(layer), id(plan))
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = _Route(layer, plan, lambda *a: self._mask(plan, *a))
        if not route.segments:
            return out
        if len(route.segments) == 1 and plan.single_full:  # every row uses the same adapter, in order
            layer.add_bypass_(out, route.names[0], x)
        elif route.mask is not None and not torch.is_grad_enabled() and (
            route.pad is None or x.numel() // x.shape[-1] * len(route.names) <= DENSE_WORK
        ) and out.dtype == route.a_cat.dtype and out.is_contiguous():
            self._add_dense(x, out, route)
        elif route.pad is not None and not torch.is_grad_enabled():
            self._add_batched(x, out, route)
        else:  # one small A/B pair per adapter on its rows (other layer types, or gradients needed)
            xs = self.gathered(x, plan.perm)  # (M, ..., in), rows grouped by adapter
            for name, s, e in route.segments:
                layer.add_bypass_(out, name, xs[s:e], rows=plan.perm[s:e])
        return out

    def _mask(self, plan: RowPlan, names: tuple, r: int, dtype, device) -> torch.Tensor:
        """(N, 1, k·r): 1 on the r columns of each row's own adapter among ``names``; shared by every
        layer that holds the same adapters."""
        key = (id(plan), names, r, dtype, str(device))
        if key not in self._masks:
            slot = {n: j for j, n in enumerate(names)}
            rows = self._row_names(plan.rows)
            cols = torch.tensor([slot.get(n, len(names)) for n in rows], device=device)
            mask = torch.nn.functional.one_hot(cols, len(names) + 1)[:, : len(names)].to(dtype)  # None rows: all 0
            self._masks[key] = mask[:, None, :, None].expand(-1, 1, -1, r).reshape(plan.rows, 1, len(names) * r)
        return self._masks[key]

    def _row_names(self, batch: int) -> list:
        rep = batch // len(self.names)
        return [x for x in self.names for _ in range(rep)]

    def _add_dense(self, x: torch.Tensor, out: torch.Tensor, route: _Route) -> None:
        """Every adapter of the mix on every row, masked to each row's own (BGMV-style, without
        per-row weight copies): three dense ops (``adapter.masked_bypass_``)."""
        masked_bypass_(out, x.to(route.a_cat.dtype), route.a_cat, route.mask, route.b_cat)

    def _add_batched(self, x: torch.Tensor, out: torch.Tensor, route: _Route) -> None:
        """Several adapters in one batched matmul pair (SGMV-style): each adapter's rows, padded to
        the longest segment, against that adapter's stacked (rank-padded, pre-scaled) A and B."""
        pad, a_t, b_t = route.pad, route.a_t, route.b_t  # (k, in, r), (k, r, out)
        k, length = pad.shape
        mid = x.shape[1:-1]
        xs = self.gathered(x, pad.index).reshape(k, -1, x.shape[-1]).to(a_t.dtype)
        keep = None if pad.keep is None else pad.keep.expand(k, length, int(xs.shape[1] // length), 1).reshape(k, -1, 1)
        delta = stacked_bypass(xs, a_t, b_t, keep).view(k * length, *mid, -1).to(out.dtype)
        if pad.inverse is not None:  # a gather: on CPU far cheaper than index_add_'s scatter
            out.add_(delta.index_select(0, pad.inverse))
        else:
            out.index_add_(0, pad.index, delta)

    def gathered(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x.index_select(0, index)``, reused by the next layers that read the same unchanged input
        (the gather is a copy of the whole activation)."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        hit = self._gather
        if hit is not None and hit[0] is x and hit[1] == version and hit[2] is index:
            return hit[3]
        xs = x.index_select(0, index)
        self._gather = (x, version, index, xs)
        return xs


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward of ``model`` uses adapter ``adapter_names[i]``.

    ``None`` rows get the base model. Row i's output equals the model's output with only that
    adapter active (Hu et al. 2021 eq. 3 per row). The active set is ignored and left
    unchanged. Works with transformers ``generate``: when the batch is k times longer (beam
    search, ``num_return_sequences``), each name is repeated k times in place, as ``generate``
    expands rows.

    Args:
        model: a model with injected adapters, in eval mode and not merged.
        adapter_names: one entry per batch row, an adapter name or None.

    Raises:
        AdapterNotFoundError: an unknown name (on entry, before any compute).
        MixedBatchError: not a list, empty names, model in training mode, a nested block (on
            entry); a forward whose batch size is not a multiple of ``len(adapter_names)``
            (raised by the first LoRA layer, before any adapter compute).
        MergeStateError: adapters are merged.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise MixedBatchError(f"adapter_names must be a list with one entry per row, got {adapter_names!r}")
    names = list(adapter_names)
    if not names:
        raise MixedBatchError("adapter_names must have one entry per batch row, got an empty list")
    check_known(model, [n for n in names if n is not None])
    if is_merged(model):
        raise MergeStateError("mixed_batch needs unmerged adapters; call unmerge(model) first")
    if model.training:
        raise MixedBatchError("mixed_batch is for inference; call model.eval() first (dropout would differ per row)")
    state = attach_state(model)
    if state.rows is not None:
        raise MixedBatchError("mixed_batch blocks cannot be nested")
    state.rows = RowRouter(names, {n: i for i, n in enumerate(state.configs)})
    try:
        yield model
    finally:
        state.rows = None
