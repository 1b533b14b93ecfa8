"""A different adapter for each row of one batch (S-LoRA / Punica style serving).

An add-on to the layers: ``mixed_batch`` installs a ``RowRouter`` as the model state's ``rows``;
every LoRA layer's forward then hands ``(layer, x, out)`` to ``RowRouter.add_bypass`` instead of
adding the active adapters. The router reads the batch size from the layer's own input
(``x.shape[0]``), so nothing is guessed from the model's argument names.

The base matmuls run once for the whole batch. The LoRA part groups rows by adapter once per
batch size (``rows.plan_rows``: a stable sort into segments, as in SGMV, in injection order). A
linear LoRA layer keeps every resident adapter in its ``AdapterBank`` (``lorakit.bank``: stacked once,
rank-padded with zeros, scaling folded into B; an adapter added or deleted writes or frees its own
slot, one changed in place has its slot rewritten). Decoding-sized forwards use the bank as it lies while it
holds at most ``BANK_SPARE`` times the mix's adapters, so a new mix of rows copies no adapter
weights: all of its adapters on every row in two dense matmuls masked to each row's own while that
is small (BGMV-like), else every slot's rows padded to the busiest slot in one batched matmul pair
(``adapter.stacked_bypass``). With more resident, the same pair runs over the layer's ``HotBank``
(``lorakit.hot``): the mix's adapters in a few slots, where an adapter stays while it is in the
mixes, so a change of mix copies only the adapters new to it. Larger forwards (prefill) run each
adapter on its slice of the batch when its rows are consecutive (the serving engine groups them
so), else over the hot slots in one batched matmul pair (SGMV-like). The op count does not grow
with the number of adapters, except for a last resort (and forwards that need gradients, and other
layer types): one small A/B pair per adapter. Activations are gathered, never a per-row copy of
adapter weights. ``set_rows`` gives an open block new rows (a request joining or leaving a served
batch) without checking the factors the block has checked already; the per-layer routes are
``lorakit.routes``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from . import lora_bias
from .adapter import masked_bypass_, stacked_bypass
from .bank import AdapterBank
from .errors import MergeStateError, MixedBatchError
from .routes import Route, rescale_dora_rows_
from .rows import BankLayout, RowPlan, bank_layout, plan_rows
from .tree import attach_state, check_known, is_merged, lora_layers


# Decoding-sized forwards of a batched (linear) layer use the adapters resident in the layer's bank
# as they lie (nothing gathered, so a new mix of rows costs no copy of adapter weights): all of them
# on every row in two dense matmuls with a mask keeping each row's own (``adapter.masked_bypass_``)
# while the bank spans at most DENSE_COLUMNS rank columns and rows x tokens x columns stay within
# DENSE_WORK (the dense form computes every slot for every row); else each slot's rows, padded to
# the busiest slot's count (slots x that count x tokens within BANK_ROWS), in one batched matmul
# pair over every slot, the results gathered back to their rows. Otherwise (prefill) adapters run
# on slices of the batch when each one's rows are consecutive, on the mix's padded segments, or one
# by one. Measured on 2 noisy CPU cores with SmolLM2 shapes, 16 adapters of r=8 resident: at 16
# decoding rows spread at random the dense form's step is 1.1-1.7x the base's, the slots' 1.4-1.9x;
# at 32 rows, two per adapter, the slots' 1.3-1.4x, the dense form's 1.6x.
DENSE_COLUMNS = 128
DENSE_WORK = 2048
BANK_ROWS = 1024
# The bank's slots as they lie cost every resident adapter's factors per step; with more than
# BANK_SPARE times as many resident as in the batch, the mix's factors are copied into the layer's
# hot slots instead (``lorakit.hot``: only adapters new to the mix are copied, once; the next steps
# and mixes reuse them), so a step costs the same with 16 or 256 resident. A copy costs about two
# steps' reads of the adapters it copies, once; the spare slots cost (resident / mix - 1) of a step's
# reads every step: at 32 resident and 16 in the batch, 2 read twice the bytes (greedy generation
# 1.39x the base's time against 1.25x through the hot slots, 6 interleaved pairs on 2 CPU threads).
BANK_SPARE = 1.25
# The slots' results go back to their rows with one gather and one add (decoding-sized: index_add_ costs
# about 0.1 ms a call on CPU), or, from SCATTER_ELEMENTS elements of output on (prefill), with one
# index_add_: at 32 rows x 64 tokens x 1536 features 0.3 ms against 1.1-2.9 ms (the gathered copy no
# longer fits in cache); the two measured equal at about 32 x 32 x 576 and 32 x 12 x 1536.
SCATTER_ELEMENTS = 1 << 19


class RowRouter:
    """Adds each batch row's own adapter in every LoRA layer while ``mixed_batch`` runs.

    Caches for the block's lifetime: which adapters of each layer's resident ``AdapterBank`` were
    checked against their factors (``bank``: once per block, however the rows change); until the rows
    change (``reroute``), the row plan per (batch size, device), per layer and plan a ``routes.Route`` (the
    adapters it holds and what its forms need), and the last gathered input (q/k/v read one tensor,
    gate/up another, so the next layers reuse its gather). Decoding steps of one ``generate`` share one
    plan and one route per layer: nothing is sorted or stacked per step. Without gradients, a new plan's
    routes are built for every batched layer of ``layers`` (the model's LoRA layers) in one pass at its
    first forward (``_prepare``).
    """

    def __init__(self, names: list[str | None], rank: dict[str, int] | None = None, layers: Sequence = ()) -> None:
        self._checked: dict[int, tuple[int, frozenset]] = {}  # id(layer) -> (adapters version, names checked)
        # run(fn, *args): fn(*args), which the modules call for their rows: under torch.compile eagerly (Dynamo
        # failed inside this bookkeeping: plans, routes and caches kept by identity). Dynamo is loaded whenever a
        # model is compiled; importing it for a block that is not would cost seconds
        self.run = torch.compiler.disable(_call) if "torch._dynamo" in sys.modules else _call
        self._layers = tuple(layer for layer in layers if getattr(layer, "batched", False))
        self.reroute(names, rank)

    def reroute(self, names: list[str | None], rank: dict[str, int] | None = None) -> None:
        """Route rows to ``names`` from the next forward on (``set_rows``): plans, routes, masks and layouts
        are built again; the factors checked in this block are not checked again."""
        self.names = names
        self.rank = rank  # adapter -> position: segments of one set of adapters always in one order
        self._plans: dict[tuple[int, str], RowPlan] = {}
        self._routes: dict[tuple[int, int], Route] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._layouts: dict[tuple, BankLayout] = {}
        self._gather: tuple | None = None

    def bank(self, layer, names: tuple) -> AdapterBank:
        """``layer.bank(names)``: the layer's resident adapters stacked, the slots of ``names`` checked against
        their factors (``AdapterBank.sync``) once per block: the stacked forms of a block see the factors as
        they were when it checked them, and a change of rows (``reroute``) checks only adapters not checked
        yet. Adapters added to or deleted from the layer meanwhile are seen (its adapters version)."""
        version, bank = layer._adapters_version, layer._bank
        seen = self._checked.get(id(layer))
        done = seen[1] if bank is not None and seen is not None and seen[0] == version else frozenset()
        if bank is not None and done.issuperset(names):
            return bank
        bank = layer.bank([n for n in names if n not in done])
        self._checked[id(layer)] = (version, done | frozenset(names))
        return bank

    def plan(self, batch: int, device) -> RowPlan:
        """The row plan for a forward of ``batch`` rows; each name repeats ``batch / len(names)`` times
        in place, as ``generate`` expands rows for beam search and ``num_return_sequences``.

        Raises:
            MixedBatchError: ``batch`` is not a multiple of the number of names.
        """
        key = (batch, device)  # torch.device hashes by value; str(device) cost a few µs per layer
        plan = self._plans.get(key)
        if plan is None:
            n = len(self.names)
            if batch % n:
                raise MixedBatchError(
                    f"mixed_batch got {n} adapter names but the forward has batch size {batch} "
                    f"(expected {n}, or a multiple of it for beam search / num_return_sequences)"
                )
            plan = self._plans[key] = plan_rows(self._row_names(batch), device, self.rank)
        return plan

    def route(self, layer, plan: RowPlan) -> Route:
        """``layer``'s ``routes.Route`` for ``plan``, built on first use."""
        key = (id(layer), id(plan))
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = Route(layer, plan, self, BANK_SPARE)
        return route

    def _prepare(self, plan: RowPlan, x: torch.Tensor) -> None:
        """Every batched layer's route for a new ``plan``, built in one pass before the first of them runs
        (``x``: that layer's input), each with what its form for such an input reads made current: the
        bank's slots checked against the factors, the mix's adapters made hot. The layers would do the same
        one by one in the forward, but there each one's bookkeeping meets caches the base matmuls have just
        flushed: a first step after ``set_rows`` (64 resident, one adapter new to the mix) took 0.449 s that way
        against 0.401 s prepared, the next step 0.350 s (SmolLM2, 10 interleaved pairs on 2 CPU threads)."""
        tokens = x.numel() // x.shape[-1]
        for layer in self._layers:
            if layer.base_layer.weight.device == x.device:
                route = self.route(layer, plan)
                if route.batched:
                    route.bank_dense() if _dense(route, tokens) else route.slot_segments()

    def add_bypass(self, layer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus, for each row, the bypass of that row's adapter on ``layer`` (Hu et al. 2021 eq. 3)."""
        if x.dim() < 2:
            raise MixedBatchError(f"mixed_batch needs inputs with a batch dimension; a layer got shape {list(x.shape)}")
        if layer.training:  # refused on entry too: dropout would differ per row
            raise MixedBatchError("the model was put in training mode inside mixed_batch; call model.eval() before "
                                  "the next forward (dropout would differ per row)")
        plan = self._plans.get((x.shape[0], x.device))
        if plan is None:
            plan = self.plan(x.shape[0], x.device)
            if not torch.is_grad_enabled():  # the batched forms run without gradients only
                self._prepare(plan, x)
        route = self.route(layer, plan)
        if not route.segments:
            return out
        if len(route.segments) == 1 and plan.single_full:  # every row uses the same adapter, in order
            layer.add_bypass_(out, route.names[0], x)
        elif route.batched and not torch.is_grad_enabled() and self._add_decode(x, out, route):
            pass
        elif plan.contiguous:  # each adapter on its own slice of the batch: no gather, no scatter
            for name, s, e in route.segments:
                r0 = int(plan.perm[s])
                layer.add_bypass_(out[r0:r0 + e - s], name, x[r0:r0 + e - s])
        elif route.batched and not torch.is_grad_enabled() and route.slots_fit():
            self._add_slots(x, out, route)
        else:  # one small A/B pair per adapter on its rows (other layer types, or gradients needed)
            xs = self.gathered(x, plan.perm)  # (M, ..., in), rows grouped by adapter
            for name, s, e in route.segments:
                layer.add_bypass_(out, name, xs[s:e], rows=plan.perm[s:e])
        for ad, rows in route.biased:  # the bypasses above leave out lora_bias: added to their rows here
            lora_bias.add_(out, ad, layer.output_axis, rows)
        for ad, rows in route.dora:
            rescale_dora_rows_(layer, ad, out, rows)
        return out

    def mask(self, plan: RowPlan, names: tuple, r: int, dtype, device) -> torch.Tensor:
        """(N, 1, k·r): 1 on the r columns of each row's own adapter among ``names``; shared by every
        layer with the same adapters in the same order."""
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

    def layout(self, plan: RowPlan, slots: tuple, device) -> BankLayout:
        """The plan's rows over bank slots ``slots``; shared by every layer with that slot order."""
        key = (id(plan), slots, str(device))
        if key not in self._layouts:
            self._layouts[key] = bank_layout(self._row_names(plan.rows), slots, device)
        return self._layouts[key]

    def _add_decode(self, x: torch.Tensor, out: torch.Tensor, route: Route) -> bool:
        """The decoding-sized forms (see ``DENSE_COLUMNS``, ``BANK_SPARE``): the bank's adapters masked,
        or the slots (the bank's, or the hot ones when ``route.sparse``) in one batched matmul pair.
        Returns False, adding nothing, when neither applies."""
        tokens = x.numel() // x.shape[-1]
        if _dense(route, tokens) and out.is_contiguous():
            a_cat, b_cat, mask = route.bank_dense()
            if out.dtype == a_cat.dtype:
                masked_bypass_(out, x if x.dtype is a_cat.dtype else x.to(a_cat.dtype), a_cat, mask, b_cat)
                return True
        a_t, b_t, layout = route.slot_segments()
        if a_t.shape[0] * layout.length * (tokens // x.shape[0]) <= BANK_ROWS:
            self._add_bank(x, out, a_t, b_t, layout)
            return True
        return False

    def _add_bank(self, x, out, a_t, b_t, layout: BankLayout) -> None:
        """``out`` += each slot's rows (padded to ``layout.length``; ``keep`` zeroes the padding) through
        that slot's factors ``a_t`` (S, in, r), ``b_t`` (S, r, out): one batched matmul pair over the
        slots as they lie. Results go back to their rows with one gather through ``inverse`` (rows
        without an adapter here point at an appended zero row), or with one ``index_add_`` through
        ``index`` for outputs of ``SCATTER_ELEMENTS`` or more when no slot is padded."""
        k, length = a_t.shape[0], layout.length
        xs = x if layout.identity else self.gathered(x, layout.index)  # rows grouped by slot already: no copy
        xs = xs.reshape(k, -1, x.shape[-1])
        if xs.dtype is not a_t.dtype:  # a no-op .to() still costs a dispatch, 210 times a step
            xs = xs.to(a_t.dtype)
        keep = layout.keep
        if keep is not None:
            keep = keep.expand(k, length, int(xs.shape[1] // length), 1).reshape(k, -1, 1)
        delta = stacked_bypass(xs, a_t, b_t, keep).view(k * length, *x.shape[1:-1], -1)
        if delta.dtype is not out.dtype:
            delta = delta.to(out.dtype)
        if layout.identity:
            out.add_(delta)
            return
        if keep is None and out.numel() >= SCATTER_ELEMENTS:  # no padded row: every row of delta is real
            out.index_add_(0, layout.index, delta)
            return
        if not layout.complete:
            delta = torch.cat([delta, delta.new_zeros((1, *delta.shape[1:]))])  # row k·L: no adapter here
        out.add_(delta.index_select(0, layout.inverse))

    def _add_slots(self, x: torch.Tensor, out: torch.Tensor, route: Route) -> None:
        """Several adapters in one batched matmul pair (SGMV-style, prefill): each slot's rows, padded
        to the busiest slot, against the slot's rank-padded, pre-scaled A and B."""
        self._add_bank(x, out, *route.slot_segments())

    def gathered(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x.index_select(0, index)``, reused by the next layers that read the same unchanged input
        (the gather is a copy of the whole activation)."""
        if x.is_inference():  # no version counter: an in-place change to x would go unseen, so no reuse
            return x.index_select(0, index)
        hit = self._gather
        if hit is not None and hit[0] is x and hit[1] == x._version and hit[2] is index:
            return hit[3]
        xs = x.index_select(0, index)
        self._gather = (x, x._version, index, xs)
        return xs


def _call(fn, *args):
    return fn(*args)


def _dense(route: Route, tokens: int) -> bool:
    """Whether a decoding-sized forward of ``tokens`` (rows × tokens) through ``route`` takes the bank's
    dense masked form (see ``DENSE_COLUMNS``); never with many more resident than in the batch (``sparse``:
    the mix's own adapters, in hot slots)."""
    if route.sparse:
        return False
    columns = route.columns()
    return columns <= DENSE_COLUMNS and tokens * columns <= DENSE_WORK


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward of ``model`` uses adapter ``adapter_names[i]``.

    ``None`` rows get the base model. Row i's output equals the model's output with only that
    adapter active (Hu et al. 2021 eq. 3 per row; a DoRA adapter's rows are rescaled by its
    ``m / ‖W + s·B·A‖_c`` after the bypass, Liu et al. 2024 eq. 5). The active set is ignored and left
    unchanged. Works with transformers ``generate``: when the batch is k times longer (beam
    search, ``num_return_sequences``), each name is repeated k times in place, as ``generate``
    expands rows.

    Args:
        model: a model with injected adapters, in eval mode and not merged.
        adapter_names: one entry per batch row, an adapter name or None.

    Raises:
        AdapterNotFoundError: an unknown name (on entry, before any compute).
        MixedBatchError: not a list, empty names, model in training mode, a nested block, an
            adapter with ``bias`` other than "none" mixed with other rows, or one with
            ``target_parameters`` (on entry); a forward whose batch size is not a multiple of ``len(adapter_names)``,
            or in training mode (``model.train()`` inside the block), raised by the first LoRA layer, before any
            adapter compute.
        MergeStateError: adapters are merged.
    """
    names, state = _checked_names(model, adapter_names)
    if state.rows is not None:
        raise MixedBatchError("mixed_batch blocks cannot be nested")
    state.rows = RowRouter(names, {n: i for i, n in enumerate(state.configs)}, [m for _, m in lora_layers(model)])
    try:
        yield model
    finally:
        state.rows = None


def set_rows(model: nn.Module, adapter_names: Sequence[str | None]) -> None:
    """Inside a ``mixed_batch`` block, route row i of the next forwards to ``adapter_names[i]`` instead.

    What a serving engine does when a request joins or leaves the batch: cheaper than a new block,
    because the block has checked its adapters' factors already (an adapter new to the block is checked
    on first use); everything ``mixed_batch`` says of the rows holds. Change adapter weights in place
    (an optimizer step, a reload under the same name) only between blocks, which see the change:
    inside one, a forward may read the factors as the block first read them or as they are now,
    depending on the form each layer takes.

    Raises:
        MixedBatchError: no ``mixed_batch`` block is open on ``model``, or the names are refused as
            ``mixed_batch`` refuses them (the block's rows are then left as they were).
        AdapterNotFoundError: an unknown name.
        MergeStateError: adapters are merged.
    """
    names, state = _checked_names(model, adapter_names)
    if state.rows is None:
        raise MixedBatchError("set_rows works inside a mixed_batch block; none is open on this model")
    state.rows.reroute(names, {n: i for i, n in enumerate(state.configs)})


def _checked_names(model: nn.Module, adapter_names) -> tuple[list, object]:
    """``(names, model state)`` for ``mixed_batch`` / ``set_rows``, or the error ``mixed_batch`` documents."""
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
    mixed = {n for n in names if n is not None}
    trains_bias = sorted(n for n in mixed if state.configs[n].bias != "none")
    if trains_bias and len(mixed | {None} if None in names else mixed) > 1:  # one set of biases for every row
        raise MixedBatchError(f"adapter {trains_bias[0]!r} trains the model's own biases "
                              f"(bias={state.configs[trains_bias[0]].bias!r}); its rows cannot share a batch with "
                              "other adapters or the base model")
    on_params = sorted(n for n in mixed if state.configs[n].target_parameters)
    if on_params:  # an expert block's forward may see flattened tokens: its batch rows are unknown there
        raise MixedBatchError(f"adapter {on_params[0]!r} uses target_parameters "
                              f"({state.configs[on_params[0]].target_parameters!r}), which mixed_batch does not "
                              "support (PEFT neither); run its rows in a batch of their own")
    return names, state
