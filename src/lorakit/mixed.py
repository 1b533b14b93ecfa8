"""A different adapter for each row of one batch (S-LoRA / Punica style serving).

The base matmuls run once for the whole batch. The LoRA part groups rows by
adapter once per forward (a stable sort into contiguous segments, as in SGMV),
and every LoRA layer then runs one small A/B matmul pair per adapter present on
its gathered rows. Activations are gathered, never a per-row copy of adapter
weights (BGMV-style weight gathering is slower on CPU at large row counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import _is_merged, list_adapters
from .errors import AdapterNotFoundError, MergeStateError, MixedBatchError
from .inject import lora_layers


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
