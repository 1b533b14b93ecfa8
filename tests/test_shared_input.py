"""Stacked A matmuls of sibling layers (q/k/v, gate/up) give each layer its own s * B(A x)."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.layers import SharedInput

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _unshared(model):
    """A copy of ``model`` whose layers each run their own A matmul."""
    ref = copy.deepcopy(model)
    for _, layer in lorakit.lora_layers(ref):
        layer.shared_input = None
    return ref


def _count_stacks(monkeypatch):
    calls = []
    original = SharedInput._compute

    def spy(self, i, name, x, version):
        h = original(self, i, name, x, version)
        calls.append((tuple(type(m.base_layer).__name__ for m in self.members), name, h is not None))
        return h

    monkeypatch.setattr(SharedInput, "_compute", spy)
    return calls


def test_groups_follow_sibling_names():
    model = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, target_modules=ALL7))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert attn.q_proj.shared_input.members == [attn.q_proj, attn.k_proj, attn.v_proj]
    assert mlp.gate_proj.shared_input.members == [mlp.gate_proj, mlp.up_proj]
    assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None  # other inputs
    assert attn.q_proj.shared_input is not model.model.layers[1].self_attn.q_proj.shared_input
    one = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, target_modules=["q_proj", "o_proj"]))
    assert all(layer.shared_input is None for _, layer in lorakit.lora_layers(one))  # no sibling: nothing stacked


@pytest.mark.parametrize("grad", [True, False])
def test_stacked_equals_float64_reference_outputs_and_grads(grad, ids, monkeypatch):
    # per-layer ranks and alphas, so the stacked activations carry different r and scalings
    cfg = lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=ALL7, init_lora_weights=False,
                             rank_pattern={"k_proj": 2, "up_proj": 3}, alpha_pattern={"v_proj": 3.0})
    model = lorakit.inject(tiny_llama(), cfg)
    ref = _unshared(model).double()
    calls = _count_stacks(monkeypatch)
    with torch.set_grad_enabled(grad):
        out = model(ids).logits
        expected = ref(ids).logits
    assert [c[2] for c in calls] == [True] * 4  # q/k/v and gate/up of 2 layers, one stacked matmul each
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    if grad:
        out.square().sum().backward()
        expected.square().sum().backward()
        got = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got[n].grad.double(), p.grad, rtol=1e-5, atol=1e-5)


def test_stacked_forward_is_deterministic_and_holds_no_activations(ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    with torch.inference_mode():  # inference tensors have no version counter
        a = model(ids).logits
        b = model(ids).logits
    assert torch.equal(a, b)
    assert all(not layer.shared_input._h for _, layer in lorakit.lora_layers(model) if layer.shared_input)


def test_dropout_merged_and_second_adapter_are_not_stacked(ids, monkeypatch):
    model = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, target_modules=ALL7, init_lora_weights=False))
    lorakit.inject(model, lorakit.LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "gate_proj"],
                                             init_lora_weights=False), adapter_name="b")
    lorakit.set_adapter(model, ["default", "b"])
    ref = _unshared(model).double()
    calls = _count_stacks(monkeypatch)
    torch.testing.assert_close(model(ids).logits.double(), ref(ids).logits, rtol=0, atol=1e-5)
    # "b": q and v stack; gate_proj alone runs its own (None); "default" stacks both groups
    assert sorted(calls) == sorted([(("Linear",) * 3, "default", True), (("Linear",) * 2, "default", True),
                                    (("Linear",) * 3, "b", True), (("Linear",) * 2, "b", False)] * 2)
    calls.clear()
    drop = lorakit.inject(tiny_llama(), lorakit.LoRAConfig(r=4, lora_dropout=0.5, target_modules=ALL7))
    drop.train()
    drop(ids)
    assert calls and not any(c[2] for c in calls)  # each layer draws its own dropout mask
    calls.clear()
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits.double(), ref(ids).logits, rtol=0, atol=1e-5)
    assert not calls  # merged: no bypass runs


class CrossAttention(nn.Module):
    """q reads the decoder states, k and v the encoder's: the siblings do not share an input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x, memory):
        return self.q_proj(x) * 2 + self.k_proj(memory) - self.v_proj(memory)


def test_members_given_other_inputs_compute_their_own():
    model = lorakit.inject(CrossAttention(), lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                                init_lora_weights=False))
    x, memory = torch.randn(3, 8), torch.randn(3, 8)

    def by_hand(layer, inp):
        a, b = layer.lora_weights("default")
        return layer.base_layer(inp) + 2.0 * inp @ a.T @ b.T

    expected = by_hand(model.q_proj, x) * 2 + by_hand(model.k_proj, memory) - by_hand(model.v_proj, memory)
    first = model(x, memory)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    assert torch.equal(model(x, memory), first)
