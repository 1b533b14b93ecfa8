"""One ``nn.Linear`` and one plain LoRA adapter as a single op: the base product, the bypass
``s·B A x`` and their sum, with a hand-written backward (one autograd node per layer).

Autograd through the layer's usual forward (``base(x)``, ``F.linear(x, A)``, ``addmm_`` into a view of
the output) records about a dozen nodes per layer, among them a ``CopySlices`` that copies the output
gradient back through the in-place view; ``LinearBypass`` records one and writes out the five
products its backward needs. Hu et al. 2021, eq. 3: ``h = W x + b + s·B A x``, so with ``g = dL/dh``

    dL/dx = g W + s·(g B) A,  dL/dA = s·(g B)^T x,  dL/dB = s·g^T (A x),  dL/dW = g^T x,  dL/db = sum g.

The same numbers as the unfused path up to float rounding order (a test checks against float64).
Taken by ``LoRALayer.forward`` only where nothing else could see the difference: one active adapter
without DoRA, ``lora_bias`` or an active dropout, an exact ``nn.Linear`` base without hooks or a replaced
``forward``, one dtype, no autocast, outside a ``mixed_batch`` block and, when gradients are wanted, outside
``torch.func`` transforms (``plain_linear``). In-place ops on the output, double backward and forward-mode AD
(``torch.autograd.forward_ad``) work as through the general forward. Under ``torch.compile`` the node is
``_Bypass``, the same without the ``jvp`` at which Dynamo would break the graph.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .adapter import stored_adapter


def _products(x, weight, bias, a, b, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.linear(x, weight, bias) + s · h B^T, h)`` with ``h = x A^T`` (N, r): three products, the last
    one accumulated into the output."""
    x2 = x.reshape(-1, x.shape[-1])
    h = torch.mm(x2, a.t())  # (N, r): the only activation the bypass adds
    if bias is None:  # F.linear folds x to 2-D and back as matmul does: not a view to autograd
        out = F.linear(x, weight)
        out.view(-1, out.shape[-1]).addmm_(h, b.t(), alpha=s)
        return out, h
    out = F.linear(x2, weight, bias)  # with a bias F.linear's N-d output would be a view: 2-D, then
    out.addmm_(h, b.t(), alpha=s)  # reshaped as matmul does it, so the caller may change it in place
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], out.shape[-1])), h


class _Bypass(torch.autograd.Function):
    """``F.linear(x, weight, bias) + s · (x A^T) B^T`` with one backward node, and no ``jvp``: what
    ``torch.compile`` traces (Dynamo breaks the graph at a Function with one). Shapes as ``LinearBypass``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s: float):
        out, h = _products(x, weight, bias, a, b, s)
        dx, dw, _, da, db, _ = ctx.needs_input_grad
        keep = (lambda t, *needs: t if any(needs) else None)  # what no gradient needs is not kept alive
        ctx.save_for_backward(keep(x, dw, da, db), keep(weight, dx), keep(a, dx, db), keep(b, dx, da), keep(h, db))
        ctx.s, ctx.x_shape = s, x.shape
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, h = ctx.saved_tensors  # inputs as saved, so a double backward sees where they came from
        need, s = ctx.needs_input_grad, ctx.s
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        # The skinny products run as their transposes, (B^T g^T)^T and (h^T g)^T: on CPU BLAS that order is
        # 2-4x faster for them at a few hundred rows (18-25% off a block's LoRA products; RESULTS.md run 13)
        gh = torch.mm(b.t(), g2.t()).mul_(s).t() if need[0] or need[3] else None  # (N, r) = s·g B
        dx = dw = dbias = da = db = None
        if need[0]:
            dx = torch.mm(g2, weight).addmm_(gh, a).view(ctx.x_shape)
        if need[1]:
            dw = torch.mm(g2.t(), x2)
        if need[2]:
            dbias = g2.sum(0)
        if need[3]:
            da = torch.mm(gh.t(), x2)
        if need[4]:
            if torch.is_grad_enabled() or _forward_ad_level():  # create_graph, or forward-over-reverse AD: h's
                h = torch.mm(x2, a.t())  # dependence on x and A must be seen (the saved h carries no tangent)
            db = torch.mm(h.t(), g2).t().mul_(s)
        return dx, dw, dbias, da, db, None


class LinearBypass(_Bypass):
    """``F.linear(x, weight, bias) + s · (x A^T) B^T`` with one backward node. Forward-mode AD (``jvp``)
    and a double backward (``create_graph=True``: ``x A^T`` recomputed differentiably) are supported;
    under ``torch.func`` transforms ``plain_linear`` takes the general forward instead.

    Shapes: x (..., in), weight (out, in), bias (out,) or None, a (r, in), b (out, r), s a float;
    returns (..., out) in x's dtype. Gradients only for the inputs that need them; only what those
    need is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s: float):
        out = _Bypass.forward(ctx, x, weight, bias, a, b, s)
        ctx.save_for_forward(x, weight, a, b)
        return out

    @staticmethod
    def jvp(ctx, tx, tw, tbias, ta, tb, _):
        x, weight, a, b = ctx.saved_tensors
        s, out, th = ctx.s, None, None  # th: the tangent of x A^T

        def plus(acc, t):
            return t if acc is None else acc + t

        if tx is not None:
            out, th = F.linear(tx, weight), F.linear(tx, a)
        if tw is not None:
            out = plus(out, F.linear(x, tw))
        if tbias is not None:
            out = plus(out, tbias)
        if ta is not None:
            th = plus(th, F.linear(x, ta))
        if th is not None:
            out = plus(out, s * F.linear(th, b))
        if tb is not None:
            out = plus(out, s * F.linear(F.linear(x, a), tb))
        return out


def _forward_ad_level() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (a backward inside one: forward-over-reverse)."""
    return _fwad._current_level >= 0


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``) is running."""
    return torch._C._are_functorch_transforms_active()


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for types without one ("meta": shape-only forwards)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


_LINEAR_FORWARD = nn.Linear.forward


def hooked(m: nn.Module) -> bool:
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
    mods = layer._modules  # _modules / _parameters: nn.Module.__getattr__ costs a µs per read
    ad = stored_adapter(mods["adapters"]._modules, active[0])
    base = mods["base_layer"]
    if (ad is None or ad.use_dora or ad.lora_B_bias is not None or (ad._dropout and ad.lora_dropout.training)
            or type(base) is not nn.Linear or hooked(base)):
        return None
    p, bp = ad._parameters, base._parameters
    a, b, w, bias = p["lora_A"], p["lora_B"], bp.get("weight"), bp.get("bias")
    if w is None or "bias" not in bp or not (x.dtype is a.dtype is w.dtype is b.dtype) or _autocast(x.device.type):
        return None  # "bias" not among the parameters: a buffer or plain attribute, which nn.Linear still adds
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or w.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        if _functorch_active():  # torch.func transforms need setup_context; the general forward has it
            return None
        if torch.compiler.is_compiling():  # Dynamo breaks the graph at a Function with a jvp: the node without one
            return _Bypass.apply(x, w, bias, a, b, ad.scaling)
        return LinearBypass.apply(x, w, bias, a, b, ad.scaling)
    return _products(x, w, bias, a, b, ad.scaling)[0]  # the same products, no autograd node
