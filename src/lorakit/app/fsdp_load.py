"""Sharded loading of the base model for ``lorakit train --fsdp``: no rank but 0 ever holds the whole base.

Rank 0 loads the base as one process does (``models.load_base``); the other ranks build the same
model class from rank 0's config on the ``meta`` device (shapes, no storage; ``skeleton``). Every rank
injects the adapter, then ``shard`` splits each decoder layer with FSDP2 (``fully_shard``) and fills
the shards from rank 0's tensors with torch's own helper, ``set_model_state_dict(...,
StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``: rank 0 sends one whole tensor at
a time and every rank keeps only its slice. This goes layer by layer, so rank 0 drops each loaded layer
as soon as it is sharded. The adapter's initial values are rank 0's, i.e. those of a one-process run
with the same seed. Parameters outside the layers (embeddings, final norm, LM head) end whole on
every rank, as with ``distributed.shard_blocks`` on a loaded model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LoRAError

from .blocks import blocks
from .distributed import Dist, shard_blocks
from .models import LoadedModel


def _options(strict: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)


def skeleton(load, reference: str, d: Dist) -> LoadedModel:
    """``load(reference)`` on rank 0; on the other ranks the same model class built from rank 0's
    config on the ``meta`` device, and rank 0's tokenizer (a collective: every rank calls it).

    Raises:
        LoRAError: what ``load`` raised on rank 0 (e.g. ``ModelLoadError``), on every rank.
    """
    msg: list = [None]
    lm = None
    if d.main:
        try:
            lm = load(reference)
            msg[0] = (type(lm.model), lm.model.config, lm.tokenizer, lm.reference)
        except LoRAError as e:
            msg[0] = e
    dist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], LoRAError):
        raise msg[0]
    if lm is not None:
        return lm
    cls, config, tokenizer, ref = msg[0]
    with torch.device("meta"):  # parameters without storage: a few KiB whatever the base's size
        model = cls(config)
    return LoadedModel(model.eval(), tokenizer, ref)


def _unsaved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers outside the state dict (rotary ``inv_freq``: computed at build time, on meta elsewhere)."""
    saved = set(model.state_dict(keep_vars=True))
    return {n: b for n, b in model.named_buffers() if n not in saved}


def _set_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, t in values.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, t, persistent=False)


def shard(model: nn.Module, d: Dist) -> None:
    """Shard every decoder layer of ``model`` (``shard_blocks``) and fill the shards, and the rest of
    the model, from rank 0's values (a collective; see the module docstring).

    Rank 0's model holds the loaded base and adapter; the other ranks' are ``skeleton``'s meta model
    with the same adapter injected. Afterwards every rank holds its shard of each layer and the whole
    of everything outside the layers; tied weights (embedding / LM head) are tied again.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    layers = blocks(model)
    for b in layers:  # one layer at a time: rank 0 frees each loaded layer once its shards are filled
        whole = dict(b.state_dict()) if d.main else {}
        shard_blocks([b])
        set_model_state_dict(b, whole, options=_options(strict=True))
        del whole
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if any(m is b for b in layers))
    rest = {k: t for k, t in model.state_dict().items() if not k.startswith(prefixes)} if d.main else {}
    set_model_state_dict(model, rest, options=_options(strict=False))  # the layers' keys are left as they are
    buffers = [_unsaved_buffers(model) if d.main else None]
    dist.broadcast_object_list(buffers, src=0)
    _set_buffers(model, buffers[0])
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # a meta model's tensors were assigned one by one
    if d.main:
        _own_memory(model)


def _own_memory(model: nn.Module) -> None:
    """Copy what is left whole (embeddings, norm, LM head, buffers) out of the loaded file's memory map.

    transformers loads safetensors as views of one read-only map of the file; while any tensor views it,
    every page the broadcast read stays resident (measured on SmolLM2-135M: 610 MiB of file pages on
    rank 0 after sharding, 96 MiB once the map is gone)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for t in {id(t): t for t in [*model.parameters(), *model.buffers()] if not isinstance(t, DTensor)}.values():
            t.data = t.data.clone()
