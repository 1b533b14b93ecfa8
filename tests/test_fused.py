"""lorakit.fused: one plain adapter on an nn.Linear as one autograd node. Values and gradients are
checked against h = W x + b + s·B A x differentiated by autograd in float64 (Hu et al. 2021, eq. 3);
which path ran is read off the output's grad_fn."""

import math
import warnings

import pytest
import torch
from torch import nn

from lorakit import LoRALinear


def _layer(in_f=7, out_f=5, r=3, alpha=4.0, bias=True, dropout=0.0, rslora=False):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("default", r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, init_lora_weights=False)
    layer.set_adapter("default")
    return layer


def _float64_grads(layer, x, g, s):
    """Output and gradients of W x + b + s·B A x in float64, through autograd on plain tensors."""
    base = layer.base_layer
    ad = layer.adapter("default")
    leaves = {"x": x, "W": base.weight, "A": ad.lora_A, "B": ad.lora_B}
    if base.bias is not None:
        leaves["b"] = base.bias
    d = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    out = d["x"] @ d["W"].T + s * (d["x"] @ d["A"].T @ d["B"].T)
    if "b" in d:
        out = out + d["b"]
    out.backward(g.double())
    return out.detach(), {k: v.grad for k, v in d.items()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_one_node_whose_values_and_gradients_equal_float64(bias, rslora):
    layer = _layer(bias=bias, rslora=rslora)
    s = 4.0 / math.sqrt(3) if rslora else 4.0 / 3
    layer.base_layer.weight.requires_grad_(True)  # every gradient the node can give
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 4, 7, requires_grad=True)
    g = torch.randn(2, 4, 5)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LinearBypassBackward"
    out.backward(g)
    ref, grads = _float64_grads(layer, x, g, s)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-6, atol=1e-6)
    ad = layer.adapter("default")
    got = {"x": x.grad, "W": layer.base_layer.weight.grad, "A": ad.lora_A.grad, "B": ad.lora_B.grad}
    if bias:
        got["b"] = layer.base_layer.bias.grad
    assert set(got) == set(grads)
    for k, v in got.items():
        torch.testing.assert_close(v.double(), grads[k], rtol=1e-5, atol=1e-5, msg=k)


def test_frozen_parts_get_no_gradient():
    layer = _layer()
    layer.base_layer.weight.requires_grad_(False)
    layer.base_layer.bias.requires_grad_(False)
    layer.adapter("default").lora_B.requires_grad_(False)  # LoRA-FA style: only A trains
    x = torch.randn(3, 7)  # an input that needs no gradient either
    layer(x).sum().backward()
    ad = layer.adapter("default")
    assert ad.lora_A.grad is not None and ad.lora_B.grad is None
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    _, grads = _float64_grads(layer, x, torch.ones(3, 5), 4.0 / 3)
    torch.testing.assert_close(ad.lora_A.grad.double(), grads["A"], rtol=1e-5, atol=1e-5)


def test_without_gradients_no_node_and_the_same_values():
    layer = _layer()
    x = torch.randn(5, 7)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    ref, _ = _float64_grads(layer, x, torch.ones(5, 5), 4.0 / 3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def _general(layer, x) -> str:
    return type(layer(x).grad_fn).__name__


def test_the_general_forward_runs_where_the_node_would_differ():
    x = torch.randn(4, 7, requires_grad=True)
    assert _general(_layer(dropout=0.5).train(), x) != "LinearBypassBackward"  # a dropout mask per call
    assert _general(_layer(dropout=0.5).eval(), x) == "LinearBypassBackward"  # dropout is the identity
    two = _layer()
    two.add_adapter("other", r=2, lora_alpha=2, init_lora_weights=False)
    two.set_adapter(["default", "other"])
    assert _general(two, x) != "LinearBypassBackward"
    hooked = _layer()
    seen = []
    hooked.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert _general(hooked, x) != "LinearBypassBackward" and seen == [(4, 5)]  # the user's hook still runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _general(_layer(), x) != "LinearBypassBackward"
    merged = _layer()
    merged.merge()
    assert _general(merged, x) != "LinearBypassBackward"


def test_a_global_module_hook_still_sees_the_base_layer():
    layer = _layer()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        layer(torch.randn(2, 7))
    finally:
        handle.remove()
    assert "Linear" in seen


@pytest.mark.parametrize("name", ["my.adapter", "keys", "_x6b657973"])
def test_names_stored_escaped_take_the_node_with_their_own_factors(name):
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(7, 5))
    layer.add_adapter("keys", r=2, lora_alpha=2, init_lora_weights=False)  # stored as "_x6b657973"
    if name != "keys":
        layer.add_adapter(name, r=3, lora_alpha=6, init_lora_weights=False)
    layer.set_adapter(name)
    x = torch.randn(4, 7, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LinearBypassBackward"
    a, b = (t.detach().double() for t in layer.lora_weights(name))
    s = layer.adapter(name).scaling
    w, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    ref = x.detach().double() @ w.T + bias + s * (x.detach().double() @ a.T @ b.T)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-6, atol=1e-6)


def test_a_shape_only_forward_on_meta_runs():
    layer = _layer().to("meta")
    out = layer(torch.empty(3, 7, device="meta", requires_grad=True))
    assert out.shape == (3, 5) and out.device.type == "meta"
    assert type(out.grad_fn).__name__ == "LinearBypassBackward"


@pytest.mark.parametrize("grad", [True, False])
def test_torch_func_per_sample_gradients_and_vmap(grad):
    from torch.func import functional_call, grad as func_grad, vmap

    layer = _layer()
    s = 4.0 / 3
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x, y = torch.randn(4, 7), torch.randn(4, 5)

    def loss(p, xb, yb):
        return ((functional_call(layer, p, (xb,)) - yb) ** 2).sum()

    if grad:  # per-sample gradients of A and B (as DP-SGD takes them)
        per = vmap(func_grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
        for i in range(4):
            out, _ = _float64_grads(layer, x[i:i + 1], torch.zeros(1, 5), s)
            _, ref = _float64_grads(layer, x[i:i + 1], 2 * (out - y[i:i + 1].double()).float(), s)
            torch.testing.assert_close(per["adapters.default.lora_A"][i].double(), ref["A"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(per["adapters.default.lora_B"][i].double(), ref["B"], rtol=1e-5, atol=1e-5)
    else:
        with torch.no_grad():
            out = vmap(lambda xb: layer(xb))(x[:, None])
        ref, _ = _float64_grads(layer, x, torch.zeros(4, 5), s)
        torch.testing.assert_close(out[:, 0].double(), ref, rtol=1e-6, atol=1e-6)


def test_an_in_place_op_on_the_output_trains():
    layer = _layer()
    x = torch.randn(2, 3, 7)
    out = layer(x)
    out.relu_()  # as nn.ReLU(inplace=True) after the layer does
    out.sum().backward()
    ref, _ = _float64_grads(layer, x, torch.zeros(2, 3, 5), 4.0 / 3)
    mask = (ref > 0).double()
    _, grads = _float64_grads(layer, x, mask.float(), 4.0 / 3)
    torch.testing.assert_close(out.detach().double(), ref.clamp(min=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.adapter("default").lora_A.grad.double(), grads["A"], rtol=1e-5, atol=1e-5)


def test_second_order_gradients_equal_float64():
    layer = _layer().double()
    ad = layer.adapter("default")
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    g_a, g_b = torch.autograd.grad(layer(x).pow(2).sum(), [ad.lora_A, ad.lora_B], create_graph=True)
    assert type(layer(x).grad_fn).__name__ == "LinearBypassBackward"
    second = torch.autograd.grad(g_b.sum() + g_a.pow(2).sum(), [ad.lora_A, x])
    A, B = ad.lora_A.detach().requires_grad_(), ad.lora_B.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    W, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    out = xr @ W.T + bias + 4.0 / 3 * (xr @ A.T @ B.T)
    r_a, r_b = torch.autograd.grad(out.pow(2).sum(), [A, B], create_graph=True)
    expected = torch.autograd.grad(r_b.sum() + r_a.pow(2).sum(), [A, xr])
    for got, want in zip(second, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_forward_mode_jvp_equals_float64():
    layer = _layer().double()
    x, t = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    x.requires_grad_(True)  # the node runs (grad mode on, inputs needing gradients)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, t))
        assert type(out.grad_fn).__name__ == "LinearBypassBackward"
        tangent = fwAD.unpack_dual(out).tangent
    _, tangent_func = torch.func.jvp(layer, (x,), (t,))  # under torch.func: the general forward
    torch.testing.assert_close(tangent_func, tangent, rtol=1e-9, atol=1e-9)
    ad = layer.adapter("default")
    W, A, B = layer.base_layer.weight.detach(), ad.lora_A.detach(), ad.lora_B.detach()
    torch.testing.assert_close(tangent, t @ W.T + 4.0 / 3 * (t @ A.T @ B.T), rtol=1e-9, atol=1e-9)


def test_forward_over_reverse_gradient_of_b_equals_float64():
    """A backward inside an open ``forward_ad.dual_level`` (forward-over-reverse): dL/dB reused the saved
    ``x A^T``, which carries no tangent, so the tangent of dL/dB was wrong (417 against 777 in norm, a new
    user's report). Expected: the same through plain float64 tensors."""
    import torch.autograd.forward_ad as fwAD

    layer = _layer().double()
    ad = layer.adapter("default")
    x, tx = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    W, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = ad.lora_A.detach().requires_grad_(), ad.lora_B.detach().requires_grad_()
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, tx))
        assert type(out.grad_fn).__name__ == "LinearBypassBackward"
        got = [fwAD.unpack_dual(g).tangent for g in torch.autograd.grad(out.pow(2).sum(), [ad.lora_A, ad.lora_B])]
        plain = fwAD.make_dual(x, tx) @ W.T + bias + 4.0 / 3 * (fwAD.make_dual(x, tx) @ A.T @ B.T)
        want = [fwAD.unpack_dual(g).tangent for g in torch.autograd.grad(plain.pow(2).sum(), [A, B])]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["buffer", "attribute"])
def test_a_bias_that_is_not_a_parameter_is_added(kind):
    """A bias kept as a buffer or a plain attribute (not in ``_parameters``) was dropped by the one-op path
    (0.92 off, a new user's report); nn.Linear adds it, and so does the general forward taken now."""
    layer = _layer()
    b = torch.randn(5)
    del layer.base_layer.bias
    if kind == "buffer":
        layer.base_layer.register_buffer("bias", b)
    else:
        layer.base_layer.bias = b
    x = torch.randn(3, 7, requires_grad=True)
    want, _ = _float64_grads(layer, x, torch.zeros(3, 5), 4.0 / 3)  # reads base.bias: the buffer or attribute
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x).detach().double(), want, rtol=1e-5, atol=1e-5)


def test_a_forward_replaced_on_the_base_layer_still_runs():
    layer = _layer()
    x = torch.randn(3, 7, requires_grad=True)
    plain = layer.base_layer.forward
    layer.base_layer.forward = lambda i: plain(i * 2)  # what accelerate's offload / device-map hooks do
    assert type(layer(x).grad_fn).__name__ != "LinearBypassBackward"
    want, _ = _float64_grads(layer, x, torch.zeros(3, 5), 4.0 / 3)
    base = layer.base_layer
    torch.testing.assert_close(layer(x).detach().double(),
                               want + (x.detach() @ base.weight.detach().T).double(), rtol=1e-5, atol=1e-5)


def test_weights_written_between_forward_and_backward_that_no_gradient_needs():
    layer = _layer()
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(3, 7)  # no gradient for x: the base weight is not needed by the backward
    out = layer(x)
    layer.merge()
    layer.unmerge()
    out.sum().backward()
    assert layer.adapter("default").lora_B.grad is not None


def test_a_base_weight_that_is_not_a_parameter_takes_the_general_forward():
    layer = _layer()
    w = layer.base_layer.weight.detach().clone()
    del layer.base_layer.weight
    layer.base_layer.weight = w
    out = layer(torch.randn(2, 7))
    assert out.shape == (2, 5)


def test_compiled_layer_is_one_graph_with_float64_values_and_gradients():
    """Dynamo breaks the graph at an autograd.Function with a ``jvp`` (``--compile``'s blocks ran 0.88x eager
    when ``LinearBypass`` met it): under ``torch.compile`` the layer takes the same node without one, which
    traces whole, so the compiled blocks get its backward's product order too."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    traced = []

    def keep_graph(gm, _inputs):  # aot_eager, with Dynamo's graph of the forward kept to look at
        traced.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return lookup_backend("aot_eager")(gm, _inputs)

    layer = _layer()
    x = torch.randn(2, 4, 7, requires_grad=True)
    g = torch.randn(2, 4, 5)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = torch.compile(layer, backend=keep_graph)(x)
        out.backward(g)
    assert dict(counters["graph_break"]) == {}
    assert len(traced) == 1 and "autograd_function_apply" in traced[0]  # the node, in the one graph
    assert not [w for w in said if "lru_cache" in str(w.message)]  # the adapter's lookup traces without a cache
    ref, grads = _float64_grads(layer, x, g, 4.0 / 3)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-6, atol=1e-6)
    ad = layer.adapter("default")
    for k, v in {"x": x.grad, "A": ad.lora_A.grad, "B": ad.lora_B.grad}.items():
        torch.testing.assert_close(v.double(), grads[k], rtol=1e-5, atol=1e-5, msg=k)
    torch._dynamo.reset()


def test_compiled_general_forward_of_two_active_adapters_looks_them_up_without_a_cache():
    """Two active adapters take the general forward, which under ``torch.compile`` must look each adapter
    up without ``adapter_key``'s ``lru_cache`` (Dynamo warns at one), as the node does; the values are
    ``W x + b + s1·B1 A1 x + s2·B2 A2 x`` in float64."""
    layer = _layer()
    layer.add_adapter("other", r=2, lora_alpha=3.0, init_lora_weights=False)
    layer.set_adapter(["default", "other"])
    x = torch.randn(2, 4, 7)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out = torch.compile(layer, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert not [w for w in said if "lru_cache" in str(w.message)]
    d = {k: v.detach().double() for k, v in layer.state_dict().items()}
    xd = x.double()
    ref = xd @ d["base_layer.weight"].T + d["base_layer.bias"]
    for name, s in (("default", 4.0 / 3), ("other", 3.0 / 2)):
        ref = ref + s * (xd @ d[f"adapters.{name}.lora_A"].T @ d[f"adapters.{name}.lora_B"].T)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
