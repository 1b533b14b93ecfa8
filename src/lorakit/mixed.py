"""A different adapter for each row of one batch (S-LoRA / Punica style serving).

The base matmuls run once for the whole batch. The LoRA part groups rows by
adapter once per forward (a stable sort into contiguous segments, as in SGMV).
A linear LoRA layer then gathers each adapter's rows, padded to the longest
segment, and runs one batched matmul pair against the adapters' A and B stacked
once per block (rank-padded with zeros, scaling folded into B), so its op count
does not grow with the number of adapters; other layer types (and forwards that
need gradients) run one small A/B matmul pair per adapter. Activations are
gathered, never a per-row copy of adapter weights (BGMV-style weight gathering
is slower on CPU at large row counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import _is_merged, list_adapters
from .errors import AdapterNotFoundError, MergeStateError, MixedBatchError
from .inject import lora_layers


@dataclass(frozen=True)
class Padded:
    """Segments laid out for a batched matmul: ``shape`` (k adapters, L rows each).

    Attributes:
        index: int64 (k * L,), batch rows grouped by adapter; a segment shorter than L repeats its
            first row.
        keep: float (k, L, 1, 1), 0 at those repeats (their bypass is zeroed), or None if no padding.
    """

    index: torch.Tensor
    keep: torch.Tensor | None
    shape: tuple[int, int]


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
            lengths = [e - s for _, s, e in segments]
            k, length = len(segments), max(lengths)
            if k * length > 2 * sum(lengths):
                self._padded[segments] = None
            else:
                index = torch.empty((k, length), dtype=torch.long, device=self.perm.device)
                for j, (_, s, e) in enumerate(segments):
                    index[j, : e - s] = self.perm[s:e]
                    index[j, e - s:] = self.perm[s]
                keep = None
                if min(lengths) < length:
                    steps = torch.arange(length, device=self.perm.device)
                    keep = (steps < torch.tensor(lengths, device=self.perm.device)[:, None]).float()[..., None, None]
                self._padded[segments] = Padded(index.flatten(), keep, (k, length))
        return self._padded[segments]


def plan_rows(names: Sequence[str | None], device: torch.device | str = "cpu") -> RowPlan:
    """Group row indices by adapter name (None rows get the base model only)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is not None:
            groups.setdefault(n, []).append(i)
    order, segments = [], []
    for n, idx in groups.items():
        segments.append((n, len(order), len(order) + len(idx)))
        order.extend(idx)
    single_full = len(groups) == 1 and len(order) == len(names)
    perm = torch.tensor(order, dtype=torch.long, device=device)
    return RowPlan(len(names), perm, tuple(segments), single_full)


class _Holder:
    """Shared by all LoRA layers of the model for the duration of ``mixed_batch``."""

    def __init__(self, names: list[str | None]):
        self.names = names
        self.plan: RowPlan | None = None
        self._cache: dict[tuple[int, str], RowPlan] = {}
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gather: tuple | None = None

    def gathered(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x.index_select(0, index)``, reused by the next layers that read the same unchanged input
        (q/k/v read one tensor, gate/up another): the gather is a copy of the whole activation."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        hit = self._gather
        if hit is not None and hit[0] is x and hit[1] == version and hit[2] is index:
            return hit[3]
        xs = x.index_select(0, index)
        self._gather = (x, version, index, xs)
        return xs

    @torch.no_grad()
    def stacked(self, layer, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^T (k, in, r_max), (s * B)^T (k, r_max, out))`` of ``layer``'s adapters ``names``, ranks
        zero-padded to the largest (exact: the extra rank components are 0). Built on first use in the
        block; the adapters' weights are read then."""
        key = (id(layer), names)
        if key not in self._stacks:
            r_max = max(layer.r[n] for n in names)
            first = layer.lora_weights(names[0])[0]
            a_t = first.new_zeros((len(names), layer.in_features, r_max))
            b_t = first.new_zeros((len(names), r_max, layer.out_features))
            for j, n in enumerate(names):
                a, b = layer.lora_weights(n)
                a_t[j, :, : layer.r[n]] = a.t()
                b_t[j, : layer.r[n]] = b.t() * layer.scaling[n]
            self._stacks[key] = (a_t, b_t)
        return self._stacks[key]

    def prepare(self, batch: int, device) -> None:
        n = len(self.names)
        if batch % n:
            raise MixedBatchError(
                f"mixed_batch got {n} adapter names but the forward has batch size {batch} "
                f"(expected {n}, or a multiple of it for beam search / num_return_sequences)"
            )
        key = (batch, str(device))
        if key not in self._cache:
            rep = batch // n  # generate() expands each row in place (repeat_interleave)
            self._cache[key] = plan_rows([x for x in self.names for _ in range(rep)], device)
        self.plan = self._cache[key]
        self._gather = None


def _batch_size(args, kwargs) -> tuple[int, torch.device] | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "x", "input"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0], t.device
    for t in args:
        if isinstance(t, torch.Tensor):
            return t.shape[0], t.device
    return None


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward of ``model`` uses adapter ``adapter_names[i]``.

    ``None`` rows get the base model. Row i's output equals the model's output
    with only that adapter active (Hu et al. 2021 eq. 3 per row). The active set
    is ignored and left unchanged. Works with transformers ``generate``: when the
    batch is k times longer (beam search, ``num_return_sequences``), each name is
    repeated k times in place, as ``generate`` expands rows.

    Args:
        model: a model with injected adapters, in eval mode and not merged.
        adapter_names: one entry per batch row, an adapter name or None.

    Raises:
        AdapterNotFoundError: an unknown name (before any compute).
        MixedBatchError: empty names, model in training mode, or a forward whose
            batch size is not a multiple of ``len(adapter_names)`` (raised by a
            pre-forward hook, before any compute).
        MergeStateError: adapters are merged.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise MixedBatchError(f"adapter_names must be a list with one entry per row, got {adapter_names!r}")
    names = list(adapter_names)
    if not names:
        raise MixedBatchError("adapter_names must have one entry per batch row, got an empty list")
    known = list_adapters(model)
    for n in names:
        if n is not None and n not in known:
            raise AdapterNotFoundError(f"adapter {n!r} in adapter_names not found; the model has {known}")
    if _is_merged(model):
        raise MergeStateError("mixed_batch needs unmerged adapters; call unmerge(model) first")
    if model.training:
        raise MixedBatchError("mixed_batch is for inference; call model.eval() first (dropout would differ per row)")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer._row_plan is not None for layer in layers):
        raise MixedBatchError("mixed_batch blocks cannot be nested")
    holder = _Holder(names)

    def pre_hook(module, args, kwargs):
        found = _batch_size(args, kwargs)
        if found is None:
            raise MixedBatchError(f"mixed_batch cannot find the batch tensor among the inputs of {type(module).__name__}")
        holder.prepare(*found)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for layer in layers:
        layer._row_plan = holder
    try:
        yield model
    finally:
        handle.remove()
        for layer in layers:
            layer._row_plan = None
