import math

import pytest
import torch
from torch import nn

from lorakit import LoRALinear
from lorakit.adapter import adapter_key


def _layer(in_f=5, out_f=3, r=2, alpha=3.0, rslora=False, init=False, bias=True, dropout=0.0):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("default", r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, init_lora_weights=init)
    layer.set_adapter("default")
    return layer


def _reference(layer, x, s):
    """h = W x + b + s B A x in float64 (Hu et al. 2021, eq. 3)."""
    W = layer.base_layer.weight.double()
    b = layer.base_layer.bias.double()
    A, B = (t.double() for t in layer.lora_weights("default"))
    x = x.double()
    return x @ W.T + b + s * (x @ A.T @ B.T)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_float64_hand_computation(rslora):
    layer = _layer(r=4, alpha=3.0, rslora=rslora)
    s = 3.0 / math.sqrt(4) if rslora else 3.0 / 4
    assert layer.adapter("default").scaling == s
    x = torch.randn(2, 3, 6, 5)  # any leading shape
    out = layer(x)
    assert out.shape == (2, 3, 6, 3)
    torch.testing.assert_close(out.double(), _reference(layer, x, s), rtol=1e-6, atol=1e-6)


def test_zero_B_gives_base_output_bit_for_bit():
    layer = _layer(init=True)
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), layer.base_layer(x))
    a, b = layer.lora_weights("default")
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
    assert a.abs().max() <= 1 / math.sqrt(5)  # kaiming_uniform(a=sqrt 5) bound = 1/sqrt(fan_in)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4000, 3))
    layer.add_adapter("g", r=4, lora_alpha=8, init_lora_weights="gaussian")
    a, b = layer.lora_weights("g")
    assert abs(a.std().item() - 0.25) < 0.01 and torch.count_nonzero(b) == 0


def test_dropout_active_only_in_training():
    layer = _layer(dropout=0.5)
    x = torch.randn(64, 5)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _reference(layer, x, 1.5), rtol=1e-6, atol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_delta_weight_and_merge_match_forward():
    layer = _layer()
    x = torch.randn(3, 5)
    before = layer(x)
    A, B = layer.lora_weights("default")
    torch.testing.assert_close(layer.delta_weight("default"), 1.5 * B @ A)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    assert layer.merged_adapters == ["default"]


def test_bf16_base_gets_float32_adapter_and_bf16_output():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16))
    layer.add_adapter("a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.set_adapter("a")
    assert layer.lora_weights("a")[0].dtype == torch.float32
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_adapter_keys_escape_names_moduledict_cannot_hold():
    assert adapter_key("default") == "default"
    names = ["a.b", "keys", "", "_x61", "a/b", "update"]
    keys = [adapter_key(n) for n in names]
    assert len(set(keys)) == len(names) and all("." not in k and k for k in keys)
    layer = LoRALinear(nn.Linear(3, 3))
    for n in names:
        layer.add_adapter(n, r=1, lora_alpha=1)
    assert layer.adapter_names == names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_adapters_one_at_a_time_adds_each_delta_once(dtype):
    """W + s_a B_a A_a + s_b B_b A_b (by hand, float64) after merge(["a"]) then merge(["b"]); unmerge is bitwise."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4).to(dtype))
    layer.add_adapter("a", r=2, lora_alpha=3, init_lora_weights=False)
    layer.add_adapter("b", r=3, lora_alpha=6, use_rslora=True, init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    (aa, ba), (ab, bb) = ([t.detach().double() for t in layer.lora_weights(n)] for n in ("a", "b"))
    want = w0.double() + 3 / 2 * ba @ aa + 6 / math.sqrt(3) * bb @ ab
    layer.merge(["a"])
    layer.merge(["b"])
    layer.merge(["a", "b"])  # both already merged: nothing is added again
    assert layer.merged_adapters == ["a", "b"]
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the float32 sum
    torch.testing.assert_close(layer.base_layer.weight.double(), want.to(dtype).double(), rtol=0, atol=tol)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


def test_forward_skips_merged_adapters_and_adds_unmerged_ones():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 3))
    for name, alpha in (("a", 2.0), ("b", 4.0)):
        layer.add_adapter(name, r=2, lora_alpha=alpha, init_lora_weights=False)
    layer.set_adapter(["a", "b"])
    x = torch.randn(4, 5, dtype=torch.float64)
    layer.double()
    (aa, ba), (ab, bb) = ([t.detach() for t in layer.lora_weights(n)] for n in ("a", "b"))
    want = x @ layer.base_layer.weight.detach().T + layer.base_layer.bias.detach() + 1.0 * x @ aa.T @ ba.T + 2.0 * x @ ab.T @ bb.T
    layer.merge(["a"])  # a is now in W, b still runs as a bypass
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


def test_delta_weight_is_float32_by_default_and_float64_on_request():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 3).double())
    layer.add_adapter("a", r=2, lora_alpha=3.0, init_lora_weights=False)
    A, B = (t.detach() for t in layer.lora_weights("a"))  # float64, like the base weight
    want = 3.0 / 2 * B @ A
    d32, d64 = layer.delta_weight("a"), layer.delta_weight("a", torch.float64)
    assert d32.dtype == torch.float32 and d64.dtype == torch.float64
    torch.testing.assert_close(d32.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(d64, want, rtol=0, atol=1e-14)


def test_factors_are_created_on_the_base_weights_device():
    layer = LoRALinear(nn.Linear(5, 3, device="meta"))  # "meta": a device other than the default one, on any machine
    layer.add_adapter("a", r=2, lora_alpha=2.0)
    a, b = layer.lora_weights("a")
    assert a.device.type == "meta" and b.device.type == "meta"


def test_embedding_adapter_has_no_dropout_on_token_ids():
    """lora_dropout is ignored on an Embedding (PEFT neither applies it): training output = W[x] + s A^T[x] B^T."""
    from lorakit import LoRAEmbedding

    torch.manual_seed(0)
    layer = LoRAEmbedding(nn.Embedding(10, 4).double())
    layer.add_adapter("a", r=2, lora_alpha=3.0, lora_dropout=0.5, init_lora_weights=False)
    layer.set_adapter("a")
    layer.train()
    a, b = (t.detach() for t in layer.lora_weights("a"))
    x = torch.tensor([[1, 4, 4], [9, 0, 2]])
    want = layer.base_layer.weight.detach()[x] + 1.5 * (a.T[x] @ b.T)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


def test_add_bypass_to_rows_of_a_bf16_output():
    """The float32 bypass is cast to the output dtype, then added to the given rows only."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16))
    layer.add_adapter("a", r=2, lora_alpha=4.0, init_lora_weights=False)
    x = torch.randn(2, 8).to(torch.bfloat16)
    out = torch.zeros(3, 4, dtype=torch.bfloat16)
    layer.add_bypass_(out, "a", x, rows=torch.tensor([2, 0]))
    A, B = (t.detach().double() for t in layer.lora_weights("a"))  # float32 factors
    want = 2.0 * x.double() @ A.T @ B.T
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[2].double(), want[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[0].double(), want[1], rtol=1e-2, atol=1e-2)
    assert torch.count_nonzero(out[1]) == 0


class _ScaledLinear(nn.Linear):
    def forward(self, x, scale=1.0, *, shift=0.0):
        return super().forward(x) * scale + shift


class _LoRAScaled(LoRALinear):  # a LoRALayer subclass for a base whose forward takes more than x
    base_type = _ScaledLinear


def test_forward_passes_extra_arguments_to_the_base_layer():
    torch.manual_seed(0)
    layer = _LoRAScaled(_ScaledLinear(5, 3).double())
    layer.add_adapter("a", r=2, lora_alpha=2.0, init_lora_weights=False)
    layer.set_adapter("a")
    x = torch.randn(4, 5, dtype=torch.float64)
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = (t.detach() for t in layer.lora_weights("a"))
    want = (x @ W.T + b) * 3.0 + 0.5 + 1.0 * x @ A.T @ B.T
    torch.testing.assert_close(layer(x, 3.0, shift=0.5), want, rtol=0, atol=1e-12)


def _tied_head(requires_grad=True):
    """A TiedLoRALinear head sharing its weight with an embedding (what inject builds for GPT-2's lm_head)."""
    from lorakit import TiedLoRALinear

    torch.manual_seed(0)
    emb, head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    emb.weight.requires_grad_(requires_grad)
    layer = TiedLoRALinear(head)
    layer.tied_with = ("emb",)
    layer.add_adapter("a", r=2, lora_alpha=2.0, init_lora_weights=False)
    layer.set_adapter("a")
    return emb, layer


def test_merge_of_a_frozen_tied_weight_keeps_it_frozen():
    emb, layer = _tied_head(requires_grad=False)
    layer.merge()
    assert layer.base_layer.weight is not emb.weight
    assert layer.base_layer.weight.requires_grad is False


def test_unwrapped_merged_module_is_no_longer_restored_by_its_old_wrapper():
    """After unwrapped(merge=True) the merged weight is the module's weight: unmerge on the old wrapper neither
    restores W nor re-ties it to the embedding."""
    emb, layer = _tied_head()
    w0 = emb.weight.detach().clone()
    A, B = (t.detach() for t in layer.lora_weights("a"))
    want = w0 + 1.0 * B @ A
    base = layer.unwrapped(merge=True)
    layer.unmerge()
    assert base.weight is not emb.weight and torch.equal(emb.weight, w0)
    torch.testing.assert_close(base.weight.detach(), want, rtol=0, atol=1e-6)


def test_unmerge_after_moving_the_merged_layer_restores_the_original():
    layer = _layer()
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.double()  # the kept original follows the move
    layer.unmerge()
    assert layer.base_layer.weight.dtype == torch.float64
    assert torch.equal(layer.base_layer.weight, w0.double())


def test_to_empty_without_recurse_leaves_the_submodules_alone():
    layer = _layer()
    tensors = [layer.base_layer.weight, *layer.lora_weights("default")]
    before = [(t.data_ptr(), t.detach().clone()) for t in tensors]
    layer.to_empty(device="cpu", recurse=False)  # nn.Module semantics: only this module's own tensors
    after = [layer.base_layer.weight, *layer.lora_weights("default")]
    assert all(t.data_ptr() == p and torch.equal(t, v) for t, (p, v) in zip(after, before))


def test_half_precision_merge_rounds_the_sum_once():
    """float16 W = 1, two deltas of 3e-4 each (by hand): rounding once gives 1 + 2^-10 (the nearest
    float16 to 1.0006); rounding after each add would leave 1.0 (1.0003 rounds down)."""
    layer = LoRALinear(nn.Linear(1, 1, bias=False).half())
    with torch.no_grad():
        layer.base_layer.weight.fill_(1.0)
    for name in ("a", "b"):
        layer.add_adapter(name, r=1, lora_alpha=1, init_lora_weights=False)  # s = 1
        a, b = layer.lora_weights(name)
        with torch.no_grad():
            a.fill_(3e-4)
            b.fill_(1.0)
    layer.merge(["a", "b"])
    assert layer.base_layer.weight.item() == 1 + 2 ** -10
    layer.unmerge()
    assert layer.base_layer.weight.item() == 1.0
