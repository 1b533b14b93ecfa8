"""Checkpoint state of an FSDP-sharded run: the whole adapters and optimizer state, moved between the
ranks' shards and the checkpoint's files with torch's own distributed state-dict helpers
(``torch.distributed.checkpoint.state_dict``: ``get_model_state_dict`` / ``get_optimizer_state_dict``
and ``set_state_dict`` with ``full_state_dict=True``).

Under FSDP2 each rank's adapter parameters are DTensors holding one slice of every weight; reading
them directly (``adapter_state_dict``) would save rank 0's slice, and a resume would put most of the
adapter back at its initial values. ``gather`` asks torch for the full (unsharded) state instead, on
rank 0 (``cpu_offload``: the other ranks get nothing), and renames it to the DDP checkpoint's layout:
PEFT keys for the adapters, ``{index}.{name}`` for AdamW's per-parameter state. ``scatter`` does the
reverse on every rank: the whole tensors read from the files are split into this rank's shards.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import CheckpointError
from lorakit.io import adapter_tensors
from lorakit.keys import clean


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _peft_fqns(model: nn.Module, adapter: str) -> dict[str, str]:
    """PEFT key -> the model state-dict name (as torch's helpers spell it) of each tensor of ``adapter``."""
    fqn = {id(t): clean(n) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out = {}
    for key, t in adapter_tensors(model, adapter).items():
        if id(t) not in fqn:
            raise CheckpointError(f"adapter tensor {key!r} is neither a parameter nor a buffer of the model; "
                                  "an FSDP checkpoint cannot hold it")
        out[key] = fqn[id(t)]
    return out


def _model_part(model: nn.Module, adapters: list[str]) -> tuple[dict, dict, object]:
    """``({adapter: {PEFT key: state-dict name}}, model state dict, its options)``: the state dict holds
    whole CPU tensors on rank 0, nothing elsewhere, and only the trainable parameters unless an adapter
    tensor is frozen. torch gathers one tensor at a time: a layer's frozen base is never gathered whole."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    keys = {a: _peft_fqns(model, a) for a in adapters}
    # frozen adapter tensors (an active adapter not trained) are not in a trainable-only state dict
    frozen = not all(p.requires_grad for a in adapters for p in adapter_tensors(model, a).values())
    opts = _options(cpu_offload=True, ignore_frozen_params=not frozen)
    return keys, get_model_state_dict(model, options=opts), opts


def gather_adapters(model: nn.Module, adapters: list[str]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The whole tensors of ``adapters`` of a sharded model (a collective: every rank calls it):
    ``{adapter: {PEFT key: whole CPU tensor}}`` on rank 0, None on the others.

    Raises:
        CheckpointError: an adapter tensor that is no parameter or buffer of the model (named).
    """
    import torch.distributed as dist

    keys, msd, _ = _model_part(model, adapters)
    return {a: {k: msd[f] for k, f in ks.items()} for a, ks in keys.items()} if dist.get_rank() == 0 else None


def gather(model: nn.Module, opt: torch.optim.Optimizer, adapters: list[str], names: list[str]):
    """The whole adapters and optimizer state of a sharded model (a collective: every rank calls it).

    Args:
        adapters: the adapters to save (the active ones).
        names: the optimizer's parameters' names, in its order (``{index}`` of the saved state).

    Returns:
        On rank 0, ``(adapters, optimizer)``: ``{adapter: {PEFT key: whole CPU tensor}}`` and
        ``{"{index}.{state name}": whole CPU tensor}`` (``step``, ``exp_avg``, ``exp_avg_sq``);
        None on the other ranks.

    Raises:
        CheckpointError: an adapter tensor that is no parameter or buffer of the model, or
            optimizer state of a parameter not in ``names`` (named).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    keys, msd, opts = _model_part(model, adapters)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    if dist.get_rank() != 0:
        return None
    index = {clean(n): i for i, n in enumerate(names)}
    missing = sorted(set(osd["state"]) - set(index))
    if missing:
        raise CheckpointError(f"optimizer state of {missing[0]!r}, which is not among the trained parameters")
    tensors = {f"{index[f]}.{k}": v.detach().cpu().contiguous() for f, s in osd["state"].items() for k, v in s.items()}
    return {a: {k: msd[f] for k, f in ks.items()} for a, ks in keys.items()}, tensors


def scatter(model: nn.Module, opt: torch.optim.Optimizer, adapters: dict[str, dict[str, torch.Tensor]],
            state: dict[int, dict[str, torch.Tensor]], groups: list[dict], names: list[str], source: str) -> None:
    """Put a checkpoint's whole adapters and optimizer state into this rank's shards (a collective).

    Args:
        adapters: ``{adapter: {PEFT key: whole tensor}}`` as read from the checkpoint.
        state: AdamW's per-parameter state, by index into ``names``; ``groups``: its parameter groups.
        source: the checkpoint, named in errors.

    Raises:
        CheckpointError: an adapter's keys differ from the model's (first named).
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    msd = {}
    for a, tensors in adapters.items():
        keys = _peft_fqns(model, a)
        odd = sorted(set(keys) ^ set(tensors))
        if odd:
            raise CheckpointError(f"{source!r}: adapter {a!r} does not match the model: {odd[0]!r}")
        msd |= {keys[k]: t for k, t in tensors.items()}
    fqns = [clean(n) for n in names]
    osd = {"state": {fqns[i]: s for i, s in state.items()},
           "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in groups]}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=_options(strict=False))
