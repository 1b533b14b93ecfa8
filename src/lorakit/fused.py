"""One ``nn.Linear`` and one plain LoRA adapter as a single op: the base product, the bypass
``s·B A x`` and their sum, with a hand-written backward (one autograd node per layer).

Autograd through the layer's usual forward (``base(x)``, ``F.linear(x, A)``, ``addmm_`` into a view of
the output) records about a dozen nodes per layer, among them a ``CopySlices`` that copies the output
gradient back through the in-place view; ``LinearBypass`` records one and writes out the five
products its backward needs. Hu et al. 2021, eq. 3: ``h = W x + b + s·B A x``, so with ``g = dL/dh``

    dL/dx = g W + s·(g B) A,  dL/dA = s·(g B)^T x,  dL/dB = s·g^T (A x),  dL/dW = g^T x,  dL/db = sum g.

The same numbers as the unfused path up to float rounding order (a test checks against float64).
Taken by ``LoRALayer.forward`` only where nothing else could see the difference: one active adapter
without DoRA, ``lora_bias`` or an active dropout, an exact ``nn.Linear`` base without hooks, one dtype,
no autocast, outside a ``mixed_batch`` block (``plain_linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .adapter import LoRAAdapter, adapter_key


class LinearBypass(torch.autograd.Function):
    """``F.linear(x, weight, bias) + s · (x A^T) B^T`` with one backward node; also returns ``x A^T``
    (N, r), not differentiable, which the backward reuses. ``setup_context``, ``generate_vmap_rule``
    and ``jvp``: ``torch.func`` (``grad``, ``vmap``, ``jvp``) and forward-mode AD run it; a double backward
    (``create_graph=True``) recomputes ``x A^T`` differentiably.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r), s a float;
    returns ((..., out), (N, r)) with N the rows of x, all in x's dtype. Gradients only for the inputs
    that need them; only what those need is saved.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, a, b, s: float):
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)  # (N, out), fresh: the in-place add below never goes through a view
        h = torch.mm(x2, a.t())  # (N, r): the only activation the bypass adds
        out.addmm_(h, b.t(), alpha=s)
        # reshaped as matmul does it: not a view to autograd, so the caller may change the output in place
        return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], out.shape[-1])), h

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, a, b, s = inputs
        dx, dw, _, da, db, _ = ctx.needs_input_grad
        keep = (lambda t, *needs: t if any(needs) else None)  # what no gradient needs is not kept alive
        ctx.save_for_backward(keep(x, dw, da, db), keep(weight, dx), keep(a, dx, db), keep(b, dx, da),
                              keep(output[1], db))
        ctx.save_for_forward(x, weight, a, b)
        ctx.mark_non_differentiable(output[1])
        ctx.s = s

    @staticmethod
    def backward(ctx, g, _):
        x, weight, a, b, h = ctx.saved_tensors
        need, s = ctx.needs_input_grad, ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        gh = torch.mm(g2, b).mul_(s) if need[0] or need[3] else None  # (N, r) = s·g B
        dx = dw = dbias = da = db = None
        if need[0]:
            dx = torch.mm(g2, weight).addmm_(gh, a).view(g.shape[:-1] + (weight.shape[1],))
        if need[1]:
            dw = torch.mm(g2.t(), x2)
        if need[2]:
            dbias = g2.sum(0)
        if need[3]:
            da = torch.mm(gh.t(), x2)
        if need[4]:
            if torch.is_grad_enabled():  # create_graph: h's own dependence on x and A must be seen
                h = torch.mm(x2, a.t())
            db = torch.mm(g2.t(), h).mul_(s)
        return dx, dw, dbias, da, db, None

    @staticmethod
    def jvp(ctx, tx, tw, tbias, ta, tb, _):
        x, weight, a, b = ctx.saved_tensors
        s = ctx.s
        out = None

        def plus(acc, t):
            return t if acc is None else acc + t

        for term in (F.linear(tx, weight) if tx is not None else None, F.linear(x, tw) if tw is not None else None,
                     tbias):
            if term is not None:
                out = plus(out, term)
        th = None  # tangent of x A^T
        if tx is not None:
            th = F.linear(tx, a)
        if ta is not None:
            th = plus(th, F.linear(x, ta))
        if th is not None:
            out = plus(out, s * F.linear(th, b))
        if tb is not None:
            out = plus(out, s * F.linear(F.linear(x, a), tb))
        return out, None


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for types without one ("meta": shape-only forwards)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


_LINEAR_FORWARD = nn.Linear.forward


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` would run anything ``F.linear`` would skip: a hook (its own or a global one),
    or a ``forward`` replaced on the module (accelerate's offload and device-map hooks) or on ``nn.Linear``."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks
                or "forward" in m.__dict__ or nn.Linear.forward is not _LINEAR_FORWARD)  # accelerate's hooks, patches


def plain_linear(layer, x: torch.Tensor, active: list[str]) -> torch.Tensor | None:
    """``layer``'s output for ``x`` through ``LinearBypass`` (or, when no gradient is wanted, the same
    three products without an autograd node), or None where the general forward must run: see the
    module docstring for when. ``layer`` is a ``LoRALinear`` outside a ``mixed_batch`` block."""
    if len(active) != 1 or layer.merged_adapters:
        return None
    name, mods = active[0], layer._modules  # _modules / _parameters: nn.Module.__getattr__ costs a µs per read
    ad: LoRAAdapter | None = mods["adapters"]._modules.get(name)
    if ad is None or ad.name != name:  # a name stored hex-escaped (adapter_key)
        ad = mods["adapters"]._modules.get(adapter_key(name))
    base = mods["base_layer"]
    if (ad is None or ad.use_dora or ad.lora_B_bias is not None or (ad._dropout and ad.lora_dropout.training)
            or type(base) is not nn.Linear or _hooked(base)):
        return None
    p, bp = ad._parameters, base._parameters
    a, b, w, bias = p["lora_A"], p["lora_B"], bp.get("weight"), bp.get("bias")
    if w is None or not (x.dtype is a.dtype is w.dtype is b.dtype) or _autocast(x.device.type):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or w.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearBypass.apply(x, w, bias, a, b, ad.scaling)[0]
    return LinearBypass.forward(x, w, bias, a, b, ad.scaling)[0]  # the same products, no autograd node
