"""Version counters as the caches' sign that a tensor was written in place, kept true for optimizer steps.

``AdapterBank`` (per-row adapters) and DoRA's ``NormCache`` keep copies or functions of ``lora_A`` /
``lora_B`` and rebuild them when a tensor's version counter moved. Every in-place op moves it, the
for-loop and ``foreach`` optimizer steps too, but torch's ``fused=True`` kernels (``AdamW``, ``Adam``,
``SGD``, ``Adagrad``; lorakit's own training loop uses fused AdamW) write the parameters without moving
it (torch 2.13, CPU): a mixed batch after such a step served the adapter as it was before training.
``watch_optimizer_steps`` registers one hook common to all optimizers (``torch.optim.optimizer.
register_optimizer_step_post_hook``) that moves the counters of the parameters a step just updated, as
the other implementations do; it is installed when the first such cache is made.
"""

from __future__ import annotations

import threading

import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

_LOCK = threading.Lock()
_HANDLE = None


def _stepped(optimizer, args, kwargs) -> None:
    """After any optimizer's step: the version counter of each parameter it updated (those with a gradient)
    moves, once, whichever implementation ran."""
    params = [p for group in optimizer.param_groups for p in group["params"]
              if isinstance(p, torch.Tensor) and p.grad is not None and not p.is_inference()]
    if params:
        increment_version(params)


def watch_optimizer_steps() -> None:
    """Install the hook of the module docstring, once per process (thread-safe; later calls cost a lookup)."""
    global _HANDLE
    if _HANDLE is None:
        with _LOCK:
            if _HANDLE is None:
                _HANDLE = register_optimizer_step_post_hook(_stepped)
